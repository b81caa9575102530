"""The gRPC gateway: server factory, servicer (protobuf ⇄ domain only), interceptors, metrics, health."""
