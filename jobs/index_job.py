"""Ray job entrypoint: run one videoindex job on the cluster this job was submitted to.

    python jobs/index_job.py CONFIG [--resume] [--retry-failed] [--set section.key=value ...]

CONFIG is a local path, a URI read through fsspec (s3://bucket/jobs/job.yaml), or ``env:NAME`` (the YAML
text in environment variable NAME; ``videoindex submit`` sends local configs that way). Exit codes:
0 every video indexed, 1 some videos failed (rows with status=error), 2 the job failed or could not
start; the reason is logged to stderr, so ``ray job logs`` shows it. The logic lives in
``videoindex.submit.job_main``; this file only makes a missing installation obvious.

Submit it with ``videoindex submit --address http://HEAD:8265 CONFIG`` or with
``ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/index_job.py CONFIG``.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    try:
        from videoindex.submit import job_main
    except ImportError as exc:
        print(
            f"index_job: cannot import videoindex ({exc}); python is {sys.executable}. Install the project on "
            "the cluster's image (cluster/Dockerfile), or submit with --working-dir pointing at a checkout "
            "whose dependencies the cluster has.",
            file=sys.stderr,
        )
        return 2
    return job_main(argv)


if __name__ == "__main__":
    sys.exit(main())
