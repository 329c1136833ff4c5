"""A user's own package, outside fedmutual: an algorithm, a model and a dataset that configs name.

``tests/test_extension.py`` puts ``tests/plugins`` on ``sys.path`` (and on ``PYTHONPATH`` for the
command line), so configs can say ``algorithm = "mypkg.algos:FedAvgM"``, ``model = "mypkg.nets:TinyBN"``
and ``dataset = "mypkg.arrays:tiny_fmnist"``. Nothing here is imported by fedmutual itself.
"""
