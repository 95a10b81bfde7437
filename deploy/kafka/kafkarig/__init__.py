"""The pieces of the Kafka rig; ``deploy/kafka/rig.py`` is the entry point and the public API.

- ``layout``: where jars and data live, the pinned Kafka version, the rig's stderr log line.
- ``jars``: downloading the broker jars with Maven.
- ``net``: loopback ports.
- ``protocol``: a Metadata request over a raw socket, the readiness probe.
- ``properties``: the broker's ``server.properties``, plain and secured.
- ``tls``: test certificates (a CA, the broker's keystore, client certificates) made with openssl.
- ``security``: the opt-in secured listeners (SASL_SSL with SCRAM-SHA-512, SSL with client
  certificates) and ACLs on.
- ``oauth``: the opt-in OAUTHBEARER listener (JWTs checked against a JWKS).
- ``broker``: one broker process: format, start, wait until ready, stop, kill, pause.
- ``cli``: ``rig.py fetch | start | status | stop``.

Standard library only (Python 3.11+), so it runs before the project's venv exists.
"""
