<?php
// A Flute token client for PHP with nothing but the curl extension: the
// broker's HTTP/JSON read on its Unix socket (or TCP). The same pattern as
// the gRPC examples: get a token before each API call, report a token the
// API answered 401 to, wait out outages as the broker's Retry-After says.
//
//   $broker = new FluteBroker();                       // /run/flute-token-broker/broker.sock
//   $broker = new FluteBroker(baseUrl: 'http://127.0.0.1:50051');
//   $token = $broker->getToken('sandbox');             // ['accessToken' => ..., 'tokenId' => ..., ...]
//   [$status, $body] = $broker->authorizedGet('https://sandbox.api.flute.com/v2/transactions', 'sandbox');

declare(strict_types=1);

/** A refusal by the broker, with its stable reason and the retry delay. */
final class FluteBrokerError extends RuntimeException
{
    public function __construct(
        public readonly int $httpStatus,
        public readonly string $reason,
        string $message,
        /** Seconds to wait before asking again (Retry-After), when waiting helps. */
        public readonly ?int $retryAfter = null,
    ) {
        parent::__construct(sprintf('%s (%d): %s', $reason, $httpStatus, $message));
    }

    /** Whether asking again later can succeed. */
    public function retryable(): bool
    {
        return in_array($this->httpStatus, [503, 504], true);
    }
}

final class FluteBroker
{
    public function __construct(
        private readonly string $socket = '/run/flute-token-broker/broker.sock',
        private readonly ?string $baseUrl = null,
        private readonly float $timeoutSeconds = 70.0,
    ) {
    }

    /** The current token of `$environment` ('sandbox' or 'production'). */
    public function getToken(string $environment, ?int $minRemainingSeconds = null): array
    {
        $query = $minRemainingSeconds === null ? '' : "?min_remaining={$minRemainingSeconds}s";
        return $this->request('GET', "/v1/environments/{$environment}/token{$query}")['body']['token'];
    }

    /** As getToken, waiting out an outage for at most `$deadlineSeconds`. */
    public function getTokenWaiting(string $environment, float $deadlineSeconds = 60.0): array
    {
        $deadline = microtime(true) + $deadlineSeconds;
        while (true) {
            try {
                return $this->getToken($environment);
            } catch (FluteBrokerError $e) {
                $wait = $e->retryAfter ?? 1;
                if (!$e->retryable() || microtime(true) + $wait > $deadline) {
                    throw $e;
                }
                usleep($wait * 1_000_000);
            }
        }
    }

    /** The API answered 401 to the token `$rejectedTokenId`: its replacement. */
    public function refreshToken(string $environment, string $rejectedTokenId): array
    {
        $body = json_encode(['rejectedTokenId' => $rejectedTokenId], JSON_THROW_ON_ERROR);
        return $this->request('POST', "/v1/environments/{$environment}/token:refresh", $body)['body']['token'];
    }

    /**
     * Waits for the token after `$lastEtag` (the next rotation), at most
     * `$timeoutSeconds`; returns [token, etag]. With an ETag that is not
     * the current one, returns at once.
     */
    public function waitForChange(string $environment, string $lastEtag, int $timeoutSeconds = 60): array
    {
        $query = http_build_query(['wait_for_change' => 'true', 'last_etag' => $lastEtag, 'timeout_sec' => $timeoutSeconds]);
        $answer = $this->request('GET', "/v1/environments/{$environment}/token?{$query}");
        return [$answer['body']['token'], $answer['etag']];
    }

    /** Every enabled environment's state. */
    public function status(): array
    {
        return $this->request('GET', '/v1/status')['body']['environments'];
    }

    /** GET `$url` with the token; on 401, report it and retry once. Returns [status, body]. */
    public function authorizedGet(string $url, string $environment): array
    {
        $token = $this->getToken($environment);
        [$status, $body] = self::get($url, $token['accessToken']);
        if ($status === 401) {
            $token = $this->refreshToken($environment, $token['tokenId']);
            [$status, $body] = self::get($url, $token['accessToken']);
        }
        return [$status, $body];
    }

    private static function get(string $url, string $accessToken): array
    {
        $curl = curl_init($url);
        curl_setopt_array($curl, [
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_HTTPHEADER => ["Authorization: Bearer {$accessToken}"],
            CURLOPT_TIMEOUT => 30,
        ]);
        $body = curl_exec($curl);
        $status = curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        curl_close($curl);
        return [$status, $body === false ? '' : $body];
    }

    /** One request to the broker: the decoded body and the ETag, or a FluteBrokerError. */
    private function request(string $method, string $path, ?string $body = null): array
    {
        $curl = curl_init(($this->baseUrl === null ? 'http://localhost' : rtrim($this->baseUrl, '/')) . $path);
        $headers = [];
        $options = [
            CURLOPT_CUSTOMREQUEST => $method,
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_TIMEOUT_MS => (int) ($this->timeoutSeconds * 1000),
            CURLOPT_HTTPHEADER => ['Flute-Broker: true', 'Content-Type: application/json'],
            CURLOPT_HEADERFUNCTION => function ($curl, string $line) use (&$headers): int {
                $parts = explode(':', $line, 2);
                if (count($parts) === 2) {
                    $headers[strtolower(trim($parts[0]))] = trim($parts[1]);
                }
                return strlen($line);
            },
        ];
        if ($this->baseUrl === null) {
            $options[CURLOPT_UNIX_SOCKET_PATH] = $this->socket;
        }
        if ($body !== null) {
            $options[CURLOPT_POSTFIELDS] = $body;
        }
        curl_setopt_array($curl, $options);
        $raw = curl_exec($curl);
        $status = curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        $error = curl_error($curl);
        curl_close($curl);
        if ($raw === false) {
            throw new FluteBrokerError(0, 'UNREACHABLE', "cannot reach the broker: {$error}");
        }
        $decoded = json_decode($raw, true) ?? [];
        if ($status !== 200) {
            $reason = 'UNKNOWN';
            foreach ($decoded['details'] ?? [] as $detail) {
                if (str_ends_with($detail['@type'] ?? '', 'google.rpc.ErrorInfo')) {
                    $reason = $detail['reason'];
                }
            }
            $retryAfter = isset($headers['retry-after']) ? (int) $headers['retry-after'] : null;
            throw new FluteBrokerError($status, $reason, $decoded['message'] ?? $raw, $retryAfter);
        }
        return ['body' => $decoded, 'etag' => trim($headers['etag'] ?? '', '"')];
    }
}
