"""Running and watching cspine rather than serving from it: ``embedded`` (``cspine serve`` as a child process
for the demo, the clinical study and the load tests) and ``k8s`` (``cspine k8s status`` of a release on a
cluster). Import the submodules (``cspine.ops.k8s`` …)."""
