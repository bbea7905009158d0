"""hpcaccel's modules import each other in layers: no circle anywhere in the package, lazy
(in-function) imports counted, so each module can be read (and loaded) after the ones it
needs. Pure: reads the source."""
import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                       "hpcaccel")


def modules() -> dict:
    """dotted name -> file, for every module of the package (a package: its __init__)."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        rel = os.path.relpath(folder, os.path.dirname(PACKAGE)).replace(os.sep, ".")
        for f in files:
            if f.endswith(".py"):
                found[rel if f == "__init__.py" else f"{rel}.{f[:-3]}"] = os.path.join(folder, f)
    return found


def imports() -> dict:
    """module -> the package's modules it imports, anywhere in it."""
    known = modules()
    graph = {}
    for name, path in known.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        with open(path) as fh:
            tree = ast.parse(fh.read())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")
                    parent = ".".join(parts[:len(parts) - node.level + 1])
                    base = f"{parent}.{base}" if base else parent
                submodules = {f"{base}.{a.name}" for a in node.names} & set(known)
                # from . import module: that module (its package is loaded already)
                deps.update(submodules or {base})
        graph[name] = {d for d in deps if d in known} - {name}
    return graph


def test_no_import_circle_in_the_package():
    graph, done, path = imports(), set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import circle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
