"""`raybpo run` as a Ray job: the stage graph, skipping finished stages (manifests) and resuming training.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/run_pipeline.py --config jobs/configs/bpo_hh_llama3_8b.yaml --run-dir s3://bucket/runs/bpo

Takes `raybpo run`'s arguments (`--from STAGE`, `--until STAGE`, KEY=VALUE overrides). The driver joins the
cluster through RAY_ADDRESS, which Ray Jobs sets (`raybpo.cluster.init_ray`).
"""

import sys

from raybpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
