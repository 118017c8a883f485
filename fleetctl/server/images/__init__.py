"""Container images: pulled from OCI/Docker registries, stored by digest, unpacked once
per layer, and handed to the runtime as a stack of read-only lower directories."""
