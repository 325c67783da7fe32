"""Where a run stands, read from its directory (no driver log, no input, nothing written).

python jobs/status.py ./outputs/prompts-0e5d1833a7                 # one run
python jobs/status.py s3://bucket/synthetic --endpoint-url http://...  # every run under an output.uri
python jobs/status.py ./outputs/prompts-0e5d1833a7 --json          # the same, machine-readable

Exit code 0, or 2 when the location holds no run or cannot be read. Credentials for s3:// come from the
environment or the AWS configuration chain, as for the jobs.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from pipeline.runner.status import main  # noqa: E402

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="Where a canvasflow run stands: state (complete, running, stopped), shards committed, rows, "
        "errors, lock holder, rate and ETA while it runs. Given an output location, every run below it."
    )
    parser.add_argument(
        "uri", help="<output.uri>/<run.id>, or an output.uri to list its runs (local or s3://)"
    )
    parser.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (output.endpoint_url)")
    parser.add_argument("--region", default=None, help="S3 region (output.region)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = parser.parse_args()
    sys.exit(main(args.uri, endpoint_url=args.endpoint_url, region=args.region, as_json=args.json))
