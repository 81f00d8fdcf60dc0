"""Event SDK cluster operations (the guide's Kafka HA chapter as commands): render HA configs for N
brokers (``render``), mutual TLS material and client settings (``tls``), verify a running cluster
(``verify``), disk sizing (``sizing``) and the ``pom-ha kafka`` click group (``cli``)."""
