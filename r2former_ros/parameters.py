"""Parameter tables: one `ParamSpec` per ROS parameter (default, description, allowed values).

A node declares its table with `declare_parameters`, which builds the `ParameterDescriptor`s
(with `IntegerRange` / `FloatingPointRange` for numbers) and turns every invalid start-up value
into one `ParameterError` naming the parameter and what is allowed. The same table documents
the YAML files and is checked against them by the tests.
"""
from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType, SetParametersResult
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter

from r2former_core.errors import ConfigError
from r2former_core.options import Option, config_options


class ParameterError(ConfigError):
    """An invalid parameter value; the message names the parameter and the allowed values."""


@dataclass(frozen=True)
class ParamSpec:
    name: str
    default: Any
    description: str
    choices: tuple[str, ...] = ()
    min: float | None = None
    max: float | None = None
    read_only: bool = False
    extra: str = ""         # free-text constraint shown in the descriptor
    pattern: str = ""       # regular expression a string value must match
    pattern_help: str = ""

    @classmethod
    def from_config(cls, config_type: type, name: str, *, read_only: bool = False, note: str = "",
                    param: str | None = None) -> ParamSpec:
        """The parameter of field `name` of a core config dataclass (`r2former_core.options`): same default,
        description, choices and range, so node, CLI and config cannot drift."""
        default, opt = config_options(config_type)[name]
        return cls(param or name, default, opt.help + (f"; {note}" if note else ""), choices=opt.choices,
                   min=opt.min, max=opt.max, read_only=read_only, pattern=opt.pattern,
                   pattern_help=opt.pattern_help)

    @property
    def option(self) -> Option:
        return Option(self.description, self.choices, self.min, self.max, self.pattern, self.pattern_help)

    def allowed(self) -> str:
        return self.option.allowed(self.default)

    def descriptor(self) -> ParameterDescriptor:
        constrained = self.choices or self.pattern or self.min is not None or self.max is not None
        constraints = [f"allowed: {self.allowed()}"] if constrained else []
        if self.extra:
            constraints.append(self.extra)
        d = ParameterDescriptor(name=self.name, description=self.description,
                                additional_constraints="; ".join(constraints), read_only=self.read_only)
        if isinstance(self.default, bool):
            return d
        if isinstance(self.default, int) and (self.min is not None or self.max is not None):
            d.integer_range = [IntegerRange(from_value=int(self.min if self.min is not None else -2**63),
                                            to_value=int(self.max if self.max is not None else 2**63 - 1), step=1)]
        elif isinstance(self.default, float) and (self.min is not None or self.max is not None):
            d.floating_point_range = [FloatingPointRange(
                from_value=float(self.min if self.min is not None else -sys.float_info.max),
                to_value=float(self.max if self.max is not None else sys.float_info.max), step=0.0)]
        return d

    def check(self, value: Any) -> str | None:
        """None when `value` is allowed, else the reason (choices, pattern and ranges)."""
        reason = self.option.problem(value, self.default)
        return f"invalid value {value!r} for parameter {self.name}: must be {self.allowed()}" if reason else None


def declare_parameters(node: Node, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """Declare every spec on `node`; returns {name: value}. Raises ParameterError on a bad value."""
    values: dict[str, Any] = {}
    param: Parameter
    for spec in specs:
        try:
            if isinstance(spec.default, list) and not spec.default:
                # An empty array has no type of its own: declared as a double array, unset until given
                # (an empty `[]` in a params file leaves it unset too).
                descriptor = spec.descriptor()
                descriptor.type = ParameterType.PARAMETER_DOUBLE_ARRAY
                param = node.declare_parameter(spec.name, Parameter.Type.DOUBLE_ARRAY, descriptor)
                values[spec.name] = list(param.value) if param.value is not None else []
                continue
            param = node.declare_parameter(spec.name, spec.default, spec.descriptor())
        except InvalidParameterTypeException as exc:
            raise ParameterError(f"parameter {spec.name} must be a {type(spec.default).__name__} "
                                 f"({spec.allowed()}): {exc}") from None
        except InvalidParameterValueException as exc:
            raise ParameterError(f"invalid value for parameter {spec.name}: must be {spec.allowed()} ({exc})") from None
        reason = spec.check(param.value)
        if reason:
            raise ParameterError(reason)
        values[spec.name] = param.value
    node.add_on_set_parameters_callback(lambda params: _check_changes(specs, params))
    return values


def _check_changes(specs: Iterable[ParamSpec], params: list[Parameter]) -> SetParametersResult:
    by_name = {s.name: s for s in specs}
    for p in params:
        spec = by_name.get(p.name)
        reason = spec.check(p.value) if spec else None
        if reason:
            return SetParametersResult(successful=False, reason=reason)
    return SetParametersResult(successful=True)
