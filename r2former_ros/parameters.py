"""Parameter tables: one `ParamSpec` per ROS parameter (default, description, allowed values).

A node declares its table with `declare_parameters`, which builds the `ParameterDescriptor`s
(with `IntegerRange` / `FloatingPointRange` for numbers) and turns every invalid start-up value
into one `ParameterError` naming the parameter and what is allowed. The same table documents
the YAML files and is checked against them by the tests.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, SetParametersResult
from rclpy.exceptions import InvalidParameterTypeException, InvalidParameterValueException
from rclpy.node import Node
from rclpy.parameter import Parameter


class ParameterError(ValueError):
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
    extra: str = ""  # free-text constraint shown in the descriptor

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.min is not None or self.max is not None:
            kind = "an integer" if isinstance(self.default, int) and not isinstance(self.default, bool) else "a number"
            return f"{kind} in [{self.min}, {self.max}]"
        return f"a {type(self.default).__name__}"

    def descriptor(self) -> ParameterDescriptor:
        constraints = [f"allowed: {self.allowed()}"] if (self.choices or self.min is not None) else []
        if self.extra:
            constraints.append(self.extra)
        d = ParameterDescriptor(name=self.name, description=self.description,
                                additional_constraints="; ".join(constraints), read_only=self.read_only)
        if isinstance(self.default, bool):
            return d
        if isinstance(self.default, int) and (self.min is not None or self.max is not None):
            d.integer_range = [IntegerRange(from_value=int(self.min), to_value=int(self.max), step=1)]
        elif isinstance(self.default, float) and (self.min is not None or self.max is not None):
            d.floating_point_range = [FloatingPointRange(from_value=float(self.min), to_value=float(self.max),
                                                         step=0.0)]
        return d

    def check(self, value: Any) -> str | None:
        """None when `value` is allowed, else the reason (choices and ranges)."""
        if self.choices and value not in self.choices:
            return f"invalid value {value!r} for parameter {self.name}: allowed values are {', '.join(self.choices)}"
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if (self.min is not None and value < self.min) or (self.max is not None and value > self.max):
                return f"invalid value {value!r} for parameter {self.name}: must be {self.allowed()}"
        return None


def declare_parameters(node: Node, specs: Sequence[ParamSpec]) -> dict[str, Any]:
    """Declare every spec on `node`; returns {name: value}. Raises ParameterError on a bad value."""
    values: dict[str, Any] = {}
    for spec in specs:
        try:
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


def parameters_yaml(node_name: str, specs: Sequence[ParamSpec]) -> str:
    """A params file for `node_name` with every parameter at its default and a comment each."""
    lines = [f"{node_name}:", "  ros__parameters:"]
    for s in specs:
        lines.append(f"    # {s.description} ({s.allowed()}{'; read-only at run time' if s.read_only else ''})")
        lines.append(f"    {s.name}: {_yaml_scalar(s.default)}")
    return "\n".join(lines) + "\n"


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return repr(value)
