"""The layers, from the imports: detectors, undo, connectors, stream, the testbed on top; and no circle."""

from __future__ import annotations

from tests.import_graph import PRODUCT, cycles, import_graph

PACKAGES = (*PRODUCT, "testbed")


def top(module: str) -> str:
    return module.split(".")[0]


def test_no_module_imports_itself_through_others() -> None:
    assert cycles(import_graph(PACKAGES)) == []


def test_the_cycle_check_sees_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_counts_imports_inside_functions() -> None:
    # stream.cli imports the Faust app only when the worker command runs.
    assert "stream.app" in import_graph(["stream"])["stream.cli"]


def test_the_product_never_imports_the_testbed_the_tests_or_the_benchmarks() -> None:
    graph = import_graph(PACKAGES)
    wrong = {
        (module, target)
        for module, targets in graph.items()
        if top(module) in PRODUCT
        for target in targets
        if top(target) in ("testbed", "tests", "benchmarks")
    }
    assert wrong == set()


def test_detectors_import_nothing_from_stream_or_connectors() -> None:
    graph = import_graph(PACKAGES)
    wrong = {
        (module, target)
        for module, targets in graph.items()
        if top(module) == "detectors"
        for target in targets
        if top(target) != "detectors"
    }
    assert wrong == set()


def test_each_layer_imports_only_the_layers_below_it() -> None:
    # undo (the pure scope and undo planner) sits on the detectors; connectors read its input and apply its plans.
    below = {"detectors": {"detectors"}, "undo": {"detectors", "undo"}}
    below["connectors"] = {*below["undo"], "connectors"}
    below["stream"] = {*below["connectors"], "stream"}
    below["testbed"] = {*below["stream"], "testbed"}
    graph = import_graph(PACKAGES)
    wrong = {(m, t) for m, targets in graph.items() for t in targets if top(t) not in below[top(m)]}
    assert wrong == set()


def test_every_package_is_read() -> None:
    graph = import_graph(PACKAGES)
    assert {top(m) for m in graph} == set(PACKAGES)
    assert {"stream.cli", "connectors.debezium_connector", "testbed.jvm", "testbed.__main__"} <= set(graph)
