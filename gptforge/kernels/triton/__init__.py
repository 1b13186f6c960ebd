"""Our Triton kernels. Per op: ``<op>_forward.py`` and ``<op>_backward.py`` hold the kernels and
their launchers; ``<op>.py`` the custom ops and the backend functions that gptforge/kernels/dispatch.py
calls. ``configs.py`` holds the launch configurations, ``common.py`` what every launcher shares,
``tuning.py`` the autotuning budget."""
