"""`raybpo evaluate` as a Ray job: evaluate a run directory's trained policy and reward model.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/run_evaluate.py --config jobs/configs/bpo_hh_llama3_8b.yaml --run-dir s3://bucket/runs/bpo

Takes `raybpo evaluate`'s arguments.
"""

import sys

from raybpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
