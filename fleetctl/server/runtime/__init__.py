"""How sandboxes really run, behind one seam.

base.py    the `Runtime` protocol the service calls, and its data types
bwrap/     bubblewrap + overlayfs + cgroups on this machine
"""
