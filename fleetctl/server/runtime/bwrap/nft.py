"""nftables from this process, through libnftables (what the `nft` command runs).

A script costs ~0.3 ms this way against ~3.5 ms for a `nft -f -` process, and a
networked sandbox's start, removal and policy change each run one. The library comes
with the `nft` command (Debian's libnftables1, a dependency of nftables).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

OUTPUT_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON


class NftError(Exception):
    """A script nftables refused; the message is what it said."""


class Nft:
    """One libnftables context, used by one thread at a time (it is not thread-safe)."""

    def __init__(self) -> None:
        """Raises OSError when libnftables cannot be loaded."""
        found = ctypes.util.find_library("nftables")
        if found is None:
            raise OSError("libnftables is missing")
        lib = ctypes.CDLL(found)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        ctx = lib.nft_ctx_new(0)
        if not ctx:
            raise OSError("libnftables could not make a context")
        lib.nft_ctx_buffer_output(ctx)
        lib.nft_ctx_buffer_error(ctx)
        self._lib, self._ctx = lib, ctx
        self._lock = threading.Lock()

    def run(self, script: str, *, json: bool = False) -> str:
        """Run `script` (one transaction) and return what it printed (JSON if `json`);
        NftError with nftables' message when it is refused."""
        with self._lock:
            self._lib.nft_ctx_output_set_flags(self._ctx, OUTPUT_JSON if json else 0)
            failed = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            output = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            error = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        if failed:
            raise NftError(error.decode(errors="replace").strip()[:400] or "nft failed")
        return output.decode(errors="replace")
