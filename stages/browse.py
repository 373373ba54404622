"""DVC stages 'browse@NAME' and 'browse_set@LAYER' (mtc.pipeline.browse): one dictionary's feature browser.

DVC runs it with no arguments (no params.yaml value is ever part of a shell command) and the stage's
own name, in DVC_STAGE, says which dictionary; by hand: python stages/browse.py NAME."""

import sys

from mtc import pipeline

if __name__ == "__main__":
    pipeline.run_stage(pipeline.browse, dictionary_of=sys.argv[1:])
