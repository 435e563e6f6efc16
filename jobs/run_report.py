"""`raybpo report` as a Ray job: write a run directory's report (`<run_dir>/report/report.md`).

    ray job submit --address http://127.0.0.1:8265 --working-dir . --runtime-env jobs/runtime_env.yaml \
        -- python jobs/run_report.py --config jobs/configs/bpo_hh_llama3_8b.yaml --run-dir s3://bucket/runs/bpo

Takes `raybpo report`'s arguments.
"""

import sys

from raybpo.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
