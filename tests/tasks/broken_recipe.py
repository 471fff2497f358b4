"""A user recipe module that fails on import (for the recipe validation test)."""

VALUE = 1 / 0
