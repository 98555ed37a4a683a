"""The process: listeners, signals, drain and reload, and the worker supervisor."""
