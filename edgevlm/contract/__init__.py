"""The contract between the exporter and the runtime.

- `manifest`: the bundle's `edgevlm.json` as typed specs, read once when a bundle is opened;
- `kinds`: what each kind a manifest names means, as the code the runtime runs (one class per kind, registered);
- `graph`: the vision graph's input and output names.

Nothing is imported here, so `kinds` can use `graph` while `manifest` reads kinds into their classes.
"""
