"""Tools for testing pbkv: history recording and linearizability checking."""
