"""DVC stage 'extract': see mtc.pipeline.extract."""

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.extract)
