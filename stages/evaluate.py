"""DVC stages 'evaluate@NAME', 'evaluate_set@LAYER' and 'evaluate_clt@NAME'
(mtc.pipeline.evaluate): held-out metrics.

DVC runs it with no arguments (no params.yaml value is ever part of a shell command) and the stage's
own name, in DVC_STAGE, says which dictionary; by hand: python stages/evaluate.py NAME."""

import sys

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.evaluate, dictionary_of=sys.argv[1:])
