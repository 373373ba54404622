"""DVC stage 'mine@NAME': see mtc.pipeline.mine."""

import sys

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.mine, sys.argv[1])
