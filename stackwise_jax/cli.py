"""The shared entry of the report commands (evaluate, classify): absl flags, and a user's
mistake reported as one `error:` line with exit code 2, never a traceback."""

from __future__ import annotations

import sys

from stackwise_jax.errors import UserError


def run(body, required: tuple[str, ...] = ()) -> None:
    """Parses the flags the caller defined, checks that each of `required` is set, then
    calls body(FLAGS). A UserError from any of it stops the command with exit code 2."""
    from absl import app, flags, logging

    def _main(argv):
        logging.set_verbosity(logging.WARNING)  # Orbax logs at INFO
        try:
            if len(argv) > 1:
                raise UserError(f"unexpected arguments {argv[1:]}; flags are --name=value")
            for name in required:
                if not getattr(flags.FLAGS, name):
                    raise UserError(f"--{name} is required")
            body(flags.FLAGS)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    app.run(_main)
