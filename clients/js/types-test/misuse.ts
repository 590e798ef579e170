// Each line must be a type error: tests/test_browser_client_types.py counts them.
import { WsBroker } from "../wsbroker.js";

const client = new WsBroker("wss://host/ws", { token: 42 });
client.on("stat", () => {});
client.subscribe("chat").on("mesage", () => {});
client.subscribe("chat", { recover: "yes" });
const state: "open" = client.state;
client.history("chat", { limit: "50" });
