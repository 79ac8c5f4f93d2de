"""A site plugin that fails to import: the daemon must report it by name and go on."""

import rtauto_module_that_does_not_exist  # noqa: F401
