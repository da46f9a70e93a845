"""Everything that touches a weight matrix: the adapter contract and one file per method."""

from .base import (
    Adapter,
    AdapterConfig,
    AdapterConfigError,
    AdapterLayer,
    AdapterModule,
    ConfigError,
    MergeError,
    adapter_for,
    adapter_layers,
    adapter_modules,
    adapter_parameters,
    adapter_state_dict,
    config_from_dict,
    count_parameters,
    disable_adapters,
    get_adapter_class,
    inject,
    load_adapter_state_dict,
    merge,
    merge_and_unload,
    register,
    registered_adapters,
    routed_modules,
    unmerge,
)

__all__ = [
    "Adapter", "AdapterConfig", "AdapterConfigError", "AdapterLayer", "AdapterModule", "ConfigError", "MergeError",
    "adapter_for", "adapter_layers", "adapter_modules", "adapter_parameters", "adapter_state_dict", "config_from_dict",
    "count_parameters", "disable_adapters", "get_adapter_class", "inject", "load_adapter_state_dict", "merge",
    "merge_and_unload", "register", "registered_adapters", "routed_modules", "unmerge",
]
