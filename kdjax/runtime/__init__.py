"""The process and its devices: the mesh and shardings, multi-process start-up (``sharding``),
the platform and its process-wide settings (``platform``, ``cpu_flags``, ``host_memory``), and
one-off compilations (``compilation``)."""
