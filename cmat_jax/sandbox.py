"""`python -m cmat_jax.sandbox setup [--image default|packages|all] [--rebuild]`: build the OS
task's cached Debian userland and check that a sandbox starts (see docs/os_task.md).

The command lives here rather than in `cmat_jax.envs.os_sandbox` because importing the `envs`
package already imports that module, which `python -m` would then run a second time.
"""

import sys

from cmat_jax.envs.os_sandbox import main

if __name__ == "__main__":
    sys.exit(main())
