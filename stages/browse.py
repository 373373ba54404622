"""DVC stage 'browse@NAME': see mtc.pipeline.browse."""

import sys

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.browse, sys.argv[1])
