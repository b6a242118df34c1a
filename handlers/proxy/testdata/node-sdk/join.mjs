// Sends CALLS (4) concurrent chat completions with one Idempotency-Key
// through the proxy at OPENAI_BASE_URL, with the SDK's default settings
// (timeout, two retries), and prints one JSON line per call: its
// completion id, or the error the SDK gave up with.
import OpenAI from "openai";

const client = new OpenAI(); // OPENAI_BASE_URL and OPENAI_API_KEY from the environment
const calls = Number(process.env.CALLS || 4);
const results = await Promise.all(
  Array.from({ length: calls }, async () => {
    try {
      const chat = await client.chat.completions.create(
        { model: "gpt-4o-mini", messages: [{ role: "user", content: "hi" }] },
        { headers: { "Idempotency-Key": process.env.IDEMPOTENCY_KEY } },
      );
      return { id: chat.id };
    } catch (err) {
      return { error: `${err.constructor.name}: ${err.status ?? ""} ${err.message}` };
    }
  }),
);
for (const r of results) console.log(JSON.stringify(r));
