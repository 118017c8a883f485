"""Carrying out a plan against the sandbox API: live state in, changes out."""
