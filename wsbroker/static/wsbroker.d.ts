// Type declarations of wsbroker.js, the browser client of wsbroker (SPEC §14).

export type ConnectionState = "disconnected" | "connecting" | "connected";
export type SubscriptionState = "unsubscribed" | "subscribing" | "subscribed";

export interface WsBrokerOptions {
  /** A token to authenticate with; used until the server refuses it or it expires. */
  token?: string;
  /** Called (one call at a time) for a first token, a refresh before `expires`, and after 4001/4003. */
  getToken?: () => string | Promise<string>;
  /** Reconnect delays, ms: random between 0 and min(max, min * 2^failures). Defaults 500 and 20000. */
  minReconnectDelay?: number;
  maxReconnectDelay?: number;
  /** Send `ping` after this many ms with nothing received (default 25000). */
  pingInterval?: number;
  /** Reconnect when a ping or a welcome gets no answer in this many ms (default 10000). */
  pingTimeout?: number;
}

export interface StateEvent {
  state: ConnectionState;
  previous: ConnectionState;
  /** The close code and reason when a connection ended. */
  code?: number;
  reason?: string;
}

export interface Welcome {
  client: string;
  user: string;
  node: string;
  expires: number;
}

export interface Message<T = any> {
  channel: string;
  data: T;
  /** The publishing user, when a client published it. */
  from?: string;
  /** Its offset, on history channels. */
  offset?: number;
}

export interface SubscribedEvent {
  channel: string;
  /** True when every message missed since the last one delivered follows, in order. */
  recovered: boolean;
  offset?: number;
  epoch?: string;
}

export interface UnsubscribedEvent {
  channel: string;
  /** "client" after unsubscribe(), else the server's reason or error code ("forbidden", …). */
  reason: string;
}

export interface Member {
  client: string;
  user: string;
  info?: Record<string, unknown>;
}

export interface PublishResult {
  channel: string;
  offset?: number;
  epoch?: string;
}

export interface HistoryResult<T = any> {
  channel: string;
  messages: Array<{ type: "message"; channel: string; data: T; from?: string; offset?: number }>;
  offset: number;
  epoch: string;
}

export interface PresenceResult {
  channel: string;
  members: Member[];
}

export interface PresenceStatsResult {
  channel: string;
  clients: number;
  users: number;
}

/** Rejections and `error` events: `code` is the server's error code, or one of the client's. */
export class WsBrokerError extends Error {
  readonly code:
    | "disconnected" | "unauthorized" | "forbidden" | "invalid_channel" | "bad_request"
    | "rate_limited" | "unavailable" | "not_enabled" | "too_many_subscriptions"
    | "message_too_big" | "unsupported_data" | "token_failed" | "bad_url" | (string & {});
  /** The close code, when the server closed the connection for this error. */
  readonly closeCode?: number;
}

export interface WsBrokerEvents {
  state: StateEvent;
  error: WsBrokerError;
}

export interface SubscriptionEvents<T = any> {
  message: Message<T>;
  subscribed: SubscribedEvent;
  unsubscribed: UnsubscribedEvent;
  join: Member;
  leave: Member;
  error: WsBrokerError;
}

declare class Emitter<Events> {
  /** Adds a handler (a handler added twice runs once); returns a function that removes it. */
  on<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): () => void;
  off<K extends keyof Events>(event: K, handler: (value: Events[K]) => void): void;
}

export class Subscription<T = any> extends Emitter<SubscriptionEvents<T>> {
  private constructor();
  readonly channel: string;
  readonly state: SubscriptionState;
  readonly recover: boolean;
  /** The last offset delivered to the application, and its epoch (history channels). */
  readonly offset: number | undefined;
  readonly epoch: string | undefined;
  unsubscribe(): void;
}

export class WsBroker extends Emitter<WsBrokerEvents> {
  constructor(url: string, options?: WsBrokerOptions);
  readonly url: string;
  readonly state: ConnectionState;
  readonly welcome: Welcome | null;
  connect(): void;
  disconnect(): void;
  subscribe<T = any>(channel: string, options?: { recover?: boolean }): Subscription<T>;
  publish(channel: string, data: unknown): Promise<PublishResult>;
  history<T = any>(channel: string, options?: { limit?: number }): Promise<HistoryResult<T>>;
  presence(channel: string): Promise<PresenceResult>;
  presenceStats(channel: string): Promise<PresenceStatsResult>;
}
