// Type-checked (never run) by tests/test_browser_client_types.py: SPEC §14's example
// must compile against wsbroker.d.ts, and misuse must not.
import { WsBroker, WsBrokerError, type Subscription, type StateEvent } from "../wsbroker.js";

async function example(): Promise<void> {
  const client = new WsBroker("wss://host/ws", {
    getToken: async () => (await fetch("/wsbroker-token")).text(),
    minReconnectDelay: 500, maxReconnectDelay: 20000,
    pingInterval: 25000, pingTimeout: 10000,
  });
  client.on("state", ({ state, previous }: StateEvent) => {
    const states: ("disconnected" | "connecting" | "connected")[] = [state, previous];
    void states;
  });
  client.on("error", (error) => { const code: string = error.code; void code; });
  client.connect();
  const sub: Subscription<{ text: string }> = client.subscribe("chat.room1", { recover: true });
  sub.on("message", ({ data, from, offset }) => {
    const text: string = data.text;
    const sender: string | undefined = from;
    const position: number | undefined = offset;
    void [text, sender, position];
  });
  sub.on("subscribed", ({ recovered, offset, epoch }) => {
    const flags: [boolean, number | undefined, string | undefined] = [recovered, offset, epoch];
    void flags;
  });
  sub.on("unsubscribed", ({ reason }) => { const why: string = reason; void why; });
  const off = sub.on("join", (member) => { const user: string = member.user; void user; });
  off();
  sub.on("leave", (member) => { const client: string = member.client; void client; });
  const published = await client.publish("chat.room1", { text: "hi" });
  const at: number | undefined = published.offset;
  const history = await client.history("chat.room1", { limit: 50 });
  const latest: number = history.offset;
  const first: unknown = history.messages[0]?.data;
  const presence = await client.presence("chat.room1");
  const users: string[] = presence.members.map((member) => member.user);
  const stats = await client.presenceStats("chat.room1");
  const count: number = stats.clients + stats.users;
  void [at, latest, first, users, count];
  try {
    await client.publish("chat.room1", null);
  } catch (error) {
    if (error instanceof WsBrokerError && error.code === "disconnected") return;
  }
  sub.unsubscribe();
  client.disconnect();
}
void example;
