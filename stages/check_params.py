"""DVC stage 'check_params': every stage depends on it, so params.yaml is checked before DVC deletes
any stage's outputs (see mtc.pipeline.check_params)."""

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.check_params)
