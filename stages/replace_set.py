"""DVC stage 'replace_set' (mtc.replacement.replace_set): the transcoder set's replacement model."""

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.replace_set)
