"""DVC stages 'train@NAME', 'train_set@LAYER' and 'train_clt@NAME'
(mtc.pipeline.train): train one dictionary of params.yaml.

DVC runs it with no arguments (no params.yaml value is ever part of a shell command) and the stage's
own name, in DVC_STAGE, says which dictionary; by hand: python stages/train.py NAME."""

import sys

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.train, dictionary_of=sys.argv[1:])
