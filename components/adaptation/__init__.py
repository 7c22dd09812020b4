"""Adaptation methods, one module (or package) per method, chosen by ``adapt.method``.

``registry.METHODS`` maps each name to its class (explicit, no string magic); ``configs`` holds
each method's typed params section; ``base`` the interface every method implements.
"""
