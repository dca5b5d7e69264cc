"""The contract between the exporter and the runtime: `manifest` (the bundle's `edgevlm.json` as typed specs, read
once when a bundle is opened) and `graph` (the vision graph's input and output names).

Nothing is imported here, so the runtime strategies can use `graph` while `manifest` reads kinds into them.
"""
