"""DVC stage 'train@NAME': train dictionary NAME of params.yaml (see mtc.pipeline.train)."""

import sys

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.train, sys.argv[1:])
