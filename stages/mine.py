"""DVC stages 'mine@NAME' and 'mine_set@LAYER' (mtc.pipeline.mine): mine one dictionary's contexts.

DVC runs it with no arguments (no params.yaml value is ever part of a shell command) and the stage's
own name, in DVC_STAGE, says which dictionary; by hand: python stages/mine.py NAME."""

import sys

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.mine, dictionary_of=sys.argv[1:])
