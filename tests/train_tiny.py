"""examples/train.py with the tests' tiny network registered: `python tests/train_tiny.py --arch tiny --data ...`.

Same flags, messages and exit statuses as examples/train.py (it is what runs). "tiny" is
registered at import, not under the main guard: Grain's worker processes are spawned, import
this file again as their `__main__`, and look the architecture up by name.
"""

import sys

from tiny_arch import register, run_train_script

register()

if __name__ == "__main__":
    run_train_script(sys.argv[1:])
