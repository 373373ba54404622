"""DVC stage 'evaluate@NAME': see mtc.pipeline.evaluate."""

import sys

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.evaluate, sys.argv[1])
