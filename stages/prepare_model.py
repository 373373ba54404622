"""DVC stage 'prepare_model': see mtc.pipeline.prepare_model."""

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.prepare_model)
