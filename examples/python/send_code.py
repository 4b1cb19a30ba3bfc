"""Send a verification code through aliyun-sms-worker and wait for the result.

    pip install pika
    AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f python3 send_code.py 13800138000
"""
import json
import os
import sys
import uuid

import pika

amqp_url = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f")
jobs_queue = os.environ.get("SMS_JOBS_QUEUE", "sms.jobs")
phone = sys.argv[1]

job_id = f"signup-{uuid.uuid4().hex}"  # the idempotency key: reuse it to retry safely
job = {
    "id": job_id,
    "type": "send_verify_code",
    "phone_number": phone,
    "sign_name": "速通互联验证码",
    "template_code": "100001",
    "template_param": {"code": "##code##", "min": "5"},
}

connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
channel = connection.channel()
channel.confirm_delivery()  # basic_publish raises if RabbitMQ does not take the job

result = None


def on_reply(ch, method, properties, body):
    global result
    if properties.correlation_id == job_id:
        result = json.loads(body)


# Direct reply-to: consume the pseudo-queue (no-ack) before publishing on the same channel.
channel.basic_consume("amq.rabbitmq.reply-to", on_reply, auto_ack=True)
channel.basic_publish(
    exchange="",
    routing_key=jobs_queue,
    body=json.dumps(job),
    properties=pika.BasicProperties(
        content_type="application/json",
        delivery_mode=2,  # persistent
        message_id=job_id,
        correlation_id=job_id,
        reply_to="amq.rabbitmq.reply-to",
    ),
    mandatory=True,
)

deadline = 30  # seconds
while result is None and deadline > 0:
    connection.process_data_events(time_limit=1)
    deadline -= 1
connection.close()

if result is None:
    sys.exit(f"no result for {job_id} within 30 s")
print(json.dumps(result, ensure_ascii=False))
sys.exit(0 if result["status"] == "sent" else 2)
