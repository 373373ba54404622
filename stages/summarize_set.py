"""DVC stage 'summarize_set': see mtc.evaluate.summarize_set."""

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.summarize_set)
