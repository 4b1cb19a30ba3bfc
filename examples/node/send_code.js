// Send a verification code through aliyun-sms-worker and wait for the result.
//
//   npm install
//   AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f node send_code.js 13800138000
const amqp = require("amqplib");
const { randomUUID } = require("node:crypto");

const amqpUrl = process.env.AMQP_URL || "amqp://guest:guest@127.0.0.1:5672/%2f";
const jobsQueue = process.env.SMS_JOBS_QUEUE || "sms.jobs";
const phone = process.argv[2];

async function main() {
  const jobId = `signup-${randomUUID()}`; // the idempotency key: reuse it to retry safely
  const job = {
    id: jobId,
    type: "send_verify_code",
    phone_number: phone,
    sign_name: "速通互联验证码",
    template_code: "100001",
    template_param: { code: "##code##", min: "5" },
  };

  const connection = await amqp.connect(amqpUrl);
  const channel = await connection.createConfirmChannel();

  // Direct reply-to: consume the pseudo-queue (no-ack) before publishing on the same channel.
  const result = new Promise((resolve) => {
    channel.consume(
      "amq.rabbitmq.reply-to",
      (msg) => {
        if (msg.properties.correlationId === jobId) resolve(JSON.parse(msg.content.toString()));
      },
      { noAck: true },
    );
  });
  channel.publish("", jobsQueue, Buffer.from(JSON.stringify(job)), {
    contentType: "application/json",
    persistent: true,
    messageId: jobId,
    correlationId: jobId,
    replyTo: "amq.rabbitmq.reply-to",
    mandatory: true,
  });
  await channel.waitForConfirms(); // throws if RabbitMQ did not take the job

  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no result for ${jobId} within 30 s`)), 30_000);
  });
  try {
    const answer = await Promise.race([result, timeout]);
    console.log(JSON.stringify(answer));
    process.exitCode = answer.status === "sent" ? 0 : 2;
  } finally {
    clearTimeout(timer);
    await connection.close();
  }
}

main().catch((err) => {
  console.error(err.message);
  process.exit(1);
});
