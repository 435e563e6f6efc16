"""`raybpo tune` as a Ray job: a Ray Tune sweep over the config's `tune.search_space`.

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/run_tune.py --config jobs/configs/bpo_hh_llama3_8b.yaml --run-dir s3://bucket/runs/bpo

Takes `raybpo tune`'s arguments. The Tune driver runs where the job's entrypoint runs: the head node.
"""

import sys

from raybpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
