"""Builders the tests and benchmarks share: tiny random-weight models, bundles, documents, a local hub.

Import them as ``tests.helpers.<module>`` (the repository root on ``sys.path``: pytest puts it there,
benchmarks insert it themselves). Nothing here mocks fila: it writes real files fila then reads.
"""
