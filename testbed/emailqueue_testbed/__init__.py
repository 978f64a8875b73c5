"""The local test bed: kube-apiserver + etcd, RabbitMQ and a recording SMTP server."""
