"""The MQTT side: paho client set-up, the source (local broker, manual ack) and the sink (uplink, delete on PUBACK)."""
