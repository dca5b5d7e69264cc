"""Hardware profiles: what makes a bundle fast on a laptop CPU, a desktop GPU or a Jetson, written down as data.

    from edgevlm.profiles import load_profile, resolve_settings
    settings = resolve_settings("auto", bundle)      # or "cpu", "jetson-orin-nano", "my-robot.toml"

Shipped profiles are the `*.toml` files next to this module (`shipped_profiles()`); `auto` picks one from this
machine (`host.choose_profile`), or $EDGEVLM_PROFILE when set. `resolve_settings` turns a profile, a bundle and the user's explicit arguments
into onnxruntime providers with options, the vision precision, llama.cpp settings, token limits and a memory
check. `edgevlm profiles` lists them; `edgevlm profiles show NAME` prints what one resolves to here.
"""

from .host import HostInfo, choose_profile, probe_host
from .memory import MemoryEstimate, estimate_memory
from .resolve import (
    LlamaSettings,
    Overrides,
    RuntimeSettings,
    auto_profile,
    provider_options,
    resolve_settings,
    select_profile,
)
from .schema import AUTO, Profile, load_profile, shipped_profiles

__all__ = [
    "AUTO", "HostInfo", "LlamaSettings", "MemoryEstimate", "Overrides", "Profile", "RuntimeSettings", "auto_profile",
    "choose_profile", "estimate_memory", "load_profile", "probe_host", "provider_options", "resolve_settings",
    "select_profile", "shipped_profiles",
]  # fmt: skip
